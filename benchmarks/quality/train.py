"""Trains the demo's models on scikit-learn's digits and writes asag/demo/checkpoints/.

    python benchmarks/quality/train.py            # all three, seed 0 (the shipped checkpoints)
    python benchmarks/quality/train.py --only dit --steps 500

- classifier: the small CNN whose features the metrics use (train split only);
- dit: class-conditional DiT from timm Attention blocks, label dropout 0.1 (for CFG);
- unet: unconditional diffusers UNet2DModel with attention blocks.

Diffusion: epsilon prediction, 1000-step cosine ("squaredcos_cap_v2") DDPM schedule, AdamW,
an EMA of the weights (what is saved, in float16). Each checkpoint records its seed, steps,
the command and the training time.
"""

import argparse
import copy
import os
import sys
import time

import torch
import torch.nn.functional as F

from asag.demo import data, models
from asag.demo.sampling import make_train_scheduler


def _save(name, model, meta):
    os.makedirs(models.CHECKPOINTS, exist_ok=True)
    state = {k: v.detach().half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    path = os.path.join(models.CHECKPOINTS, f"{name}.pt")
    torch.save({"state_dict": state, "meta": meta}, path)
    print(f"wrote {path} ({os.path.getsize(path) / 2**20:.2f} MB)")


def _augment(x, g):
    """A random shift of up to one pixel: 1,347 digits are few."""
    dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=g))
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def train_classifier(args, x, y, x_test, y_test):
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    model = models.DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    for step in range(args.classifier_steps):
        idx = torch.randint(0, len(x), (128,), generator=g)
        loss = F.cross_entropy(model(_augment(x[idx], g)), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(x_test).argmax(-1) == y_test).float().mean().item()
    print(f"classifier: held-out accuracy {acc:.3f}")
    return model, {"test_accuracy": acc, "steps": args.classifier_steps}


def train_diffusion(args, name, model, x, y):
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed + 1)
    scheduler = make_train_scheduler()
    ema = copy.deepcopy(model).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    conditional = name == "dit"
    start = time.time()
    for step in range(args.steps):
        idx = torch.randint(0, len(x), (args.batch,), generator=g)
        x0 = _augment(x[idx], g) if args.augment else x[idx]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch,), generator=g)
        xt = scheduler.add_noise(x0, noise, t)
        if conditional:
            labels = y[idx].clone()
            labels[torch.rand(args.batch, generator=g) < 0.1] = model.num_classes  # label dropout
            pred = model(xt, t, labels)
        else:
            pred = model(xt, t).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / 200)
        opt.step()
        with torch.no_grad():
            decay = min(args.ema, (1 + step) / (10 + step))
            for e, p in zip(ema.parameters(), model.parameters()):
                e.lerp_(p, 1 - decay)
        if step % 500 == 0 or step == args.steps - 1:
            print(f"{name} step {step}: loss {loss.item():.4f} ({time.time() - start:.0f}s)", flush=True)
    return ema, {"steps": args.steps, "batch": args.batch, "lr": args.lr, "train_seconds": round(time.time() - start)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["classifier", "dit", "unet"], nargs="*")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--classifier-steps", type=int, default=1500)
    parser.add_argument("--no-augment", dest="augment", action="store_false")
    args = parser.parse_args()
    which = args.only or ["classifier", "dit", "unet"]
    x, y, x_test, y_test = data.load_digits_split(args.seed)
    command = "python " + " ".join(sys.argv)
    base = {"seed": args.seed, "command": command, "torch": str(torch.__version__)}
    if "classifier" in which:
        model, meta = train_classifier(args, x, y, x_test, y_test)
        _save("classifier", model, {**base, **meta})
    if "dit" in which:
        arch = dict(dim=96, depth=6, heads=4)
        model, meta = train_diffusion(args, "dit", models.DigitsDiT(**arch), x, y)
        _save("dit", model, {**base, **meta, "arch": arch})
    if "unet" in which:
        model, meta = train_diffusion(args, "unet", models.make_unet(), x, y)
        _save("unet", model, {**base, **meta})


if __name__ == "__main__":
    main()
