"""One optimizer step with plain SGD (lr 1, no clipping), so the weight change is exactly minus the gradient, on
however many processes torchrun starts; rank 0 saves the change. Used by test_distributed.py."""
from __future__ import annotations

import sys

import torch

from lite_ft.data.load import load_splits
from lite_ft.data.tasks import get_task
from lite_ft.model import build
from lite_ft.recipe.load import load_recipe
from lite_ft.recipe.precision import place
from lite_ft.training import distributed
from lite_ft.training.loss import LossGuard
from lite_ft.training.loop import set_seed
from lite_ft.training.memory import MemoryMonitor, StepPhases
from lite_ft.training.step import Objective, Stepper, step_stream


def main(model_dir: str, out: str, batch_size: int) -> None:
    torch.set_num_threads(1)
    recipe = load_recipe(document={
        "task": "qa", "method": "lora", "model": {"source": model_dir, "dtype": "float32"},  # fp32 on any CPU
        "data": {"train": "builtin:qa-train", "limit_train": 8, "max_length": 512},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "train": {"batch_size": batch_size, "max_steps": 1}})
    dist = distributed.start("cpu")
    placement = place(recipe)
    set_seed(0)
    built = build(recipe, placement)
    task = get_task("qa")
    encoded = [task.encode(e, built.tokenizer, recipe) for e in load_splits(recipe, task)[0].examples]
    params = [p for p in built.model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.SGD(params, lr=1.0)
    loss = LossGuard(causal=True)
    objective = dist.wrap(Objective(built.model, loss), built.model)
    constant = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    stepper = Stepper(model=built.model, objective=objective, params=params, optimizer=optimizer, scheduler=constant,
                      precision=placement.precision, loss=loss, max_grad_norm=0.0, dist=dist)
    step = next(step_stream(encoded, recipe.train, built.tokenizer.pad_token_id, True, rank=dist.rank,
                            world=dist.world))
    stepper.step(step, StepPhases(MemoryMonitor(placement.device), first=False))
    if dist.is_main:
        torch.save([b - p.detach() for b, p in zip(before, params)], out)  # SGD, lr 1: the gradient
    dist.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
