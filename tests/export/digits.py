"""A resnext_mini fitted in seconds on digits (logits with real margins for the export tests), and
the checkpoint a model is written to."""
from __future__ import annotations

import torch

from zoo.checkpoint import save_checkpoint
from zoo.registry import create_model, get_model_spec


def stacked(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """Every item of ``dataset`` as one batch. Train items are shifted at random: seed first, or
    the images (and a model fitted on them) depend on which tests ran before."""
    torch.manual_seed(0)
    items = [dataset[i] for i in range(len(dataset))]
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


def fit_resnext_mini(x: torch.Tensor, y: torch.Tensor, steps: int, classes: int = 10) -> torch.nn.Module:
    """Adam with a one-cycle lr over random batches of 64, one thread, fixed seeds; returns the
    model in eval mode."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = create_model("resnext_mini", num_classes=classes)
        opt = torch.optim.Adam(model.parameters(), 1e-2)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, 1e-2, total_steps=steps, pct_start=0.25)
        g = torch.Generator().manual_seed(0)
        model.train()
        for _ in range(steps):
            idx = torch.randint(0, len(x), (64,), generator=g)
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def make_checkpoint(path, model, name: str, norm: str = "bn", data: str | None = "synthetic",
                    input_size=None, classes=None, mean=None, std=None) -> str:
    spec = get_model_spec(name)
    input_size = list(input_size or spec.input_size)
    head = model.fc if hasattr(model, "fc") else model.classifier
    classes = classes or [f"pattern{i}" for i in range(head.out_features)]
    save_checkpoint(path, dict(
        model=model.state_dict(), model_name=name,
        model_args=dict(num_classes=len(classes), norm=norm, gn_groups=32, in_chans=input_size[0]),
        classes=list(classes), input_size=input_size, mean=list(mean or spec.mean), std=list(std or spec.std),
        data=data, epoch=1, config=dict(seed=0, val_fraction=0.2)))
    return str(path)
