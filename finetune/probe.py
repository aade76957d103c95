"""Linear heads fitted on frozen features: the probe that seeds fine-tuning, and L-BFGS for k-fold refits.

They see only feature rows and targets (no model, no images), so the data checks and the few-shot refit
reuse them on features extracted once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812 (the usual PyTorch alias)


def fit_softmax_regression(
    features: torch.Tensor,
    targets: torch.Tensor,
    num_classes: int,
    l2: float,
    steps: int,
    sample_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression by full-batch L-BFGS: (weight (D, C), bias (C,)); the bias is not
    penalised. The loss is the (sample-weighted) mean cross-entropy + `l2` x the squared weights.

    The probe's minibatch AdamW (fit_linear_probe) needs ~1,500 small steps per fit; k-fold fits (the data
    checks, the few-shot refit) would multiply that, while L-BFGS on the whole set converges in a few dozen
    to a few hundred full-batch steps.
    """
    weight = torch.zeros(features.shape[1], num_classes, requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=steps, history_size=10,
                                  line_search_fn="strong_wolfe")  # fmt: skip
    share = None if sample_weights is None else sample_weights / sample_weights.sum()

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        losses = F.cross_entropy(features @ weight + bias, targets, reduction="none")
        loss = losses.mean() if share is None else (losses * share).sum()
        loss = loss + l2 * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


def fit_linear_probe(
    train_features: torch.Tensor,
    train_targets: torch.Tensor,
    num_classes: int,
    epochs: int,
    class_weights: torch.Tensor | None = None,
    seed: int = 0,
    label_smoothing: float = 0.0,
    sample_weights: torch.Tensor | None = None,
) -> torch.nn.Linear:
    """A linear classifier on frozen features: AdamW + cosine decay, seconds even for thousands of images.

    It takes the fine-tuning loss (same class weights, same label smoothing) and, with `sample_weights`, draws
    each epoch's images in proportion to them as the fine-tuning sampler does, so the probe and the
    fine-tuned model are trained for, and compared on, the same thing.
    """
    generator = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(train_features.shape[1], num_classes)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    optimizer = torch.optim.AdamW(head.parameters(), lr=3e-3, weight_decay=1e-4)
    batch_size = 256
    count = len(train_targets)
    steps = epochs * -(-count // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, steps))
    for _ in range(epochs):
        if sample_weights is not None:
            order = torch.multinomial(sample_weights, count, replacement=True, generator=generator)
        else:
            order = torch.randperm(count, generator=generator)
        for index in torch.split(order, batch_size):
            loss = F.cross_entropy(
                head(train_features[index]), train_targets[index], weight=class_weights,
                label_smoothing=label_smoothing,
            )  # fmt: skip
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return head
