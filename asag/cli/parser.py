"""The parsers of ``asag generate``, ``compare``, ``sweep`` and ``evaluate``."""

import argparse

from .options import add_asag_flags, add_call_flags, add_model_flags

METHOD_HELP = ("a method: none, cfg, pag[:scale=S,layers=L] (diffusers' PAG pipeline), asag, or "
               "asag:key=value,... (any ASAG setting, e.g. asag:scale=3,lam=2). Repeat for several; "
               "default: none, cfg and pag where they apply, asag")


def _common(parser, prompts=True, optional_model=False):
    add_model_flags(parser, optional=optional_model)
    add_call_flags(parser, prompts=prompts)
    add_asag_flags(parser)
    parser.add_argument("--step-progress", action="store_true", help="show the pipeline's own progress bar over steps")


def add_commands(sub) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    from . import commands, evaluate

    gen = sub.add_parser("generate", help="images from a diffusers pipeline with ASAG", formatter_class=fmt,
                         description="Images from a diffusers pipeline with ASAG on, each PNG holding every setting "
                                     "(seed, prompt, call arguments, ASAG settings): --reproduce FILE makes it again.")
    _common(gen, optional_model=True)
    gen.add_argument("--seeds", type=int, nargs="+", default=[0], help="one image per seed and prompt (default 0)")
    gen.add_argument("--method", default="asag", help="asag (default), asag:key=value,..., none, cfg or pag")
    gen.add_argument("--reproduce", metavar="PNG", help="make the image in PNG again from the settings saved in it")
    gen.add_argument("--out", default="asag_images")
    gen.set_defaults(func=commands.generate)

    cmp_ = sub.add_parser("compare", help="the same prompts and seeds with several methods, as one labelled grid",
                          formatter_class=fmt, description=commands.__doc__)
    _common(cmp_)
    cmp_.add_argument("--method", action="append", help=METHOD_HELP)
    cmp_.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    cmp_.add_argument("--cell", type=int, default=256, help="pixels per image in the grid")
    cmp_.add_argument("--out", default="asag_compare")
    cmp_.set_defaults(func=commands.compare)

    swp = sub.add_parser("sweep", help="a grid over one or two ASAG settings for one prompt and seed", formatter_class=fmt,
                         description="A grid over one or two ASAG settings (rows: the first --vary, columns: the "
                                     "second) for one prompt and seed: to choose settings by eye. The other "
                                     "settings come from the ASAG flags.")
    _common(swp, prompts=False)
    swp.add_argument("--prompt", default=None)
    swp.add_argument("--vary", action="append", default=[], metavar="NAME=V1,V2,...",
                     help="an ASAG setting and its values (layers: separate values with ';')")
    swp.add_argument("--seed", type=int, default=0)
    swp.add_argument("--cell", type=int, default=256)
    swp.add_argument("--out", default="asag_sweep")
    swp.set_defaults(func=commands.sweep)

    ev = sub.add_parser("evaluate", help="a prompt set x N seeds x methods, sharded over processes, with metrics",
                        formatter_class=fmt, description=evaluate.__doc__)
    _common(ev)
    ev.add_argument("--prompts", metavar="FILE", help="prompts: .txt (one per line), .json or .csv (prompt, label columns)")
    ev.add_argument("--samples", type=int, default=4, help="samples per prompt (default 4)")
    ev.add_argument("--seed", type=int, default=0, help="base seed: sample i of prompt p gets a seed fixed by (seed, p, i)")
    ev.add_argument("--method", action="append", help=METHOD_HELP)
    ev.add_argument("--clip-model", metavar="FOLDER", help="CLIP score with this local CLIP model (transformers CLIPModel)")
    ev.add_argument("--reference", metavar="FOLDER", help="FID, precision and recall against these images")
    ev.add_argument("--features", default="inception",
                    help="features for FID/precision/recall: inception (torchmetrics, local weights), digits, or module:function")
    ev.add_argument("--k", type=int, default=3, help="neighbours for precision/recall (default 3)")
    ev.add_argument("--progress", choices=["rank0", "all", "none"], default="rank0", help="progress bars: rank 0 only (default), every process, none")
    ev.add_argument("--grid-samples", type=int, default=8, help="samples per method in grid.png")
    ev.add_argument("--cell", type=int, default=128)
    ev.add_argument("--out", default="asag_evaluate")
    ev.set_defaults(func=evaluate.evaluate)
