"""The shipped unconditional digit UNet as a diffusers pipeline folder, for asag's command
line (``asag compare``, ``sweep``, ``evaluate``), and the test half of the held-out digits as a
folder of PNGs (the ``--reference`` of ``asag evaluate``).

    python -m asag.demo.export digits           # digits/pipeline and digits/reference
"""

import argparse
import os


def export_pipeline(folder: str) -> str:
    """A ``DDIMPipeline`` with the shipped UNet and the demo's sampler, saved in ``folder``."""
    from diffusers import DDIMPipeline

    from . import models
    from .sampling import make_sampler

    unet, _ = models.load("unet")
    DDIMPipeline(unet=unet, scheduler=make_sampler(1)).save_pretrained(folder)  # the pipeline sets its own steps
    return folder


def export_reference(folder: str) -> str:
    """The test half of the held-out digits, 8x8 grayscale PNGs."""
    from PIL import Image

    from . import data, models

    os.makedirs(folder, exist_ok=True)
    _, (images, labels) = data.held_out_splits(models.load("dit")[1]["seed"])  # the split the benchmark uses
    pixels = ((images[:, 0] + 1) * 127.5).round().clamp(0, 255).byte().numpy()
    for i, (image, label) in enumerate(zip(pixels, labels.tolist())):
        Image.fromarray(image, mode="L").save(os.path.join(folder, f"{i:04d}-digit{label}.png"))
    return folder


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m asag.demo.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", default="digits")
    args = parser.parse_args(argv)
    print(f"wrote {export_pipeline(os.path.join(args.out, 'pipeline'))}")
    print(f"wrote {export_reference(os.path.join(args.out, 'reference'))}")


if __name__ == "__main__":
    main()
