"""mask_gradients_: train a chosen subset of an existing model's parameters, with compact gradients."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class MaskReport:
    dense: list = field(default_factory=list)     # trained whole (e.g. biases, a head)
    sparse: list = field(default_factory=list)    # weights now SparseDeltaLinear / SparseDeltaEmbedding
    frozen: int = 0                               # parameters frozen
    trainable: int = 0                            # trainable scalars in total

    def __str__(self):
        return (f"{len(self.dense)} dense, {len(self.sparse)} sparse, {self.frozen} frozen parameters; "
                f"{self.trainable} trainable values")


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or fnmatch.fnmatchcase(name, pattern)


def _rule(names: list, masks: dict):
    """(rule, the name it was chosen by) for a parameter known by ``names`` (a tied parameter has
    several, e.g. lm_head.weight and embed_tokens.weight): the first pattern any name matches;
    (False, names[0]) if none does."""
    for pattern, rule in masks.items():
        for name in names:
            if _matches(name, pattern):
                return rule, name
    return False, names[0]


def parameter_names(model: nn.Module) -> dict[int, list[str]]:
    """{id(parameter): every name it has in ``model``}: a tied weight (a head sharing the input
    embedding's) has several."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return names


def is_tied(names: dict[int, list[str]], weight: torch.Tensor) -> bool:
    """Whether ``weight`` is one Parameter under several names (parameter_names' dict)."""
    return len(names.get(id(weight), ())) > 1


def mask_gradients_(model: nn.Module, masks: dict, *, block=None, values_dtype=torch.float32,
                    backend: str = "auto") -> MaskReport:
    """Train only what ``masks`` selects, in place; everything else is frozen.

    masks: {parameter name or fnmatch pattern: rule}, first match wins, e.g. BitFit
    ``{"*.bias": True}``, head-only ``{"lm_head.*": True}``, chosen layers
    ``{"layers.3.*": True}``. A rule is True (train the whole tensor), False (freeze), or a
    bool tensor of the parameter's shape. A partial mask on an nn.Linear weight turns that Linear
    into a SparseDeltaLinear (compact SDDMM gradient, no dense dW) — as it does on a transformers
    Conv1D's weight (GPT-2; the mask in the stored [in, out] shape, the layer then holding the
    weight transposed), and an nn.Embedding's into a SparseDeltaEmbedding (e.g. the rows of tokens
    added to the vocabulary; no [V, d] gradient); partial masks on other parameters are refused
    with an error rather than emulated by dense-gradient x mask.
    A tied parameter (a head sharing the embedding's weight) is matched by any of its names; a
    pattern that matches no name is an error, not a silently frozen model; any error leaves the
    model as it was.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"mask_gradients_: expected an nn.Module, got {type(model).__name__}")
    if not isinstance(masks, dict) or not masks:
        raise ValueError("mask_gradients_: masks must be a non-empty dict {name pattern: True | False | bool tensor}")
    report = MaskReport()
    # Every name of every parameter: a tied weight is listed once by named_parameters(), under its
    # first name, so "lm_head.*" on a model whose head is tied to the embedding matched nothing.
    names = parameter_names(model)
    params = {id(p): p for _, p in model.named_parameters(remove_duplicate=False)}
    every_name = [n for ns in names.values() for n in ns]
    unmatched = [pattern for pattern in masks if not any(_matches(n, pattern) for n in every_name)]
    if unmatched:
        raise ValueError(f"mask_gradients_: {unmatched} match no parameter name (names look like "
                         f"{every_name[:6]}{' ...' if len(every_name) > 6 else ''})")
    # Decide and check every parameter's rule, and build the sparse layers, before changing the model:
    # a bad rule leaves it as it was.
    from ..apply import requires_grad_restored_on_error

    with requires_grad_restored_on_error(model):
        plan = _plan(model, names, params, masks, block, values_dtype, backend)
    # The sparse layers are built, so the True / False rules are the last word on a shared bias too.
    for p, name, rule in plan:
        if rule is True:
            p.requires_grad_(True)
            report.dense.append(name)
            report.trainable += p.numel()
        elif rule is False:
            p.requires_grad_(False)
            report.frozen += 1
    for p, name, rule in plan:
        if isinstance(rule, tuple):
            parent_name, sd = rule
            set_submodule(model, parent_name, sd)
            report.sparse.append(parent_name + ".weight")
            report.trainable += sd.num_trainable
    return report


def _plan(model, names, params, masks, block, values_dtype, backend) -> list:
    """[(parameter, name, True | False | (Linear's name, its SparseDeltaLinear))] for every parameter."""
    from ..apply import unsupported_linear
    from ..nn._adapter import is_conv1d
    from ..nn.sparse import SparseDeltaLinear
    from ..nn.sparse_embedding import SparseDeltaEmbedding

    plan = []
    for key, p in params.items():
        rule, name = _rule(names[key], masks)
        if isinstance(rule, torch.Tensor) and len(names[key]) > 1:
            raise ValueError(f"mask_gradients_: {name} is one tensor shared by {names[key]}; a partial mask would "
                             "untie it (use True / False, or untie the weights first)")
        if isinstance(rule, torch.Tensor):
            if rule.dtype != torch.bool or tuple(rule.shape) != tuple(p.shape):
                raise ValueError(f"mask_gradients_: the mask for {name} must be a bool tensor of shape "
                                 f"{list(p.shape)}, got {rule.dtype} {list(rule.shape)}")
            if bool(rule.all()):
                rule = True
            elif not bool(rule.any()):
                rule = False
        if isinstance(rule, torch.Tensor):
            parent_name, _, leaf = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            conv1d = is_conv1d(parent)
            if isinstance(parent, nn.Embedding) and leaf == "weight":
                try:
                    layer = SparseDeltaEmbedding.from_embedding(parent, mask=rule.to(parent.weight.device),
                                                                values_dtype=values_dtype, backend=backend)
                except ValueError as exc:
                    raise ValueError(f"mask_gradients_: a partial mask on {name}: {exc}") from exc
                plan.append((p, name, (parent_name, layer)))
                continue
            if not ((isinstance(parent, nn.Linear) or conv1d) and leaf == "weight"):
                raise ValueError(f"mask_gradients_: a partial mask is supported on nn.Linear, Conv1D and nn.Embedding "
                                 f"weights (compact gradients via SparseDeltaLinear / SparseDeltaEmbedding); {name} "
                                 f"belongs to {type(parent).__name__}")
            owner_name = parent_name.rpartition(".")[0]
            reason = unsupported_linear("mask_gradients_", model.get_submodule(owner_name) if owner_name else model,
                                        parent)
            if reason is not None:
                raise ValueError(f"mask_gradients_: a partial mask on {name} cannot be trained: {reason}")
            rule = rule.t() if conv1d else rule  # SparseDeltaLinear's masks are [out, in]
            rule = (parent_name, SparseDeltaLinear.from_linear(parent, mask=rule.to(parent.weight.device),
                                                               block=block, values_dtype=values_dtype,
                                                               backend=backend))
        elif rule is not True and rule is not False:
            raise TypeError(f"mask_gradients_: the rule for {name} must be True, False or a bool tensor, "
                            f"got {type(rule).__name__}")
        plan.append((p, name, rule))
    return plan


def set_submodule(model: nn.Module, name: str, module: nn.Module):
    """Put ``module`` at ``name`` (a dotted module name) in ``model``."""
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, module)
