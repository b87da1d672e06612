"""SparseAdamW: AdamW for sparse deltas (and any small dense parameters beside them), one fused
kernel per parameter: values, fp32 moments and per-entry step counts (12 bytes of state per
trainable entry), and the merged weight W[pos] = base + delta of a SparseDeltaLinear."""
from __future__ import annotations

import weakref

import torch
from torch import nn

from .. import backends
from ..ops._checks import is_dtensor


OP = "sparse_adamw"
backends.register(OP, "torch", "peft_kernels.reference.sparse")
backends.register(OP, "triton", "peft_kernels.triton.sparse")


_STATE_DTYPES = {"exp_avg": torch.float32, "exp_avg_sq": torch.float32, "steps": torch.int32}


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard, else ``t``. FSDP2 (fully_shard) shards each parameter and, through
    zeros_like, its optimizer state alike; the update is per entry, so every rank updates the
    entries it holds."""
    return t.to_local() if is_dtensor(t) else t


def _impl(device: torch.device):
    """The module doing the update, by the registry's "auto" rule (Triton on CUDA, torch else)."""
    return backends.implementation(OP, backends.resolve(OP, "auto", device))


class SparseAdamW(torch.optim.Optimizer):
    """AdamW (torch.optim.AdamW's update, decoupled weight decay) over compact parameters.

    params: a model (every SparseDeltaLinear's delta_values, plus every other parameter with
    requires_grad), SparseDeltaLinear modules, or plain parameters / param groups. State per
    parameter: exp_avg and exp_avg_sq (fp32, shaped like it) and ``steps`` (int32 per entry:
    an entry regrown by SparseDeltaLinear.regrow_ restarts its own bias correction at step 1).
    Backend: backend="auto"'s rule for op "sparse_adamw" (the Triton kernel on CUDA, the torch
    reference on CPU; PEFT_KERNELS_BACKEND overrides it).
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01):
        if not 0.0 <= lr:
            raise ValueError(f"SparseAdamW: lr must be >= 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"SparseAdamW: betas must be in [0, 1), got {betas}")
        if not eps > 0:
            raise ValueError(f"SparseAdamW: eps must be > 0, got {eps}")
        self._owners: dict[int, weakref.ref] = {}
        params = self._collect(params)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    def _collect(self, params):
        from ..nn.sparse import SparseDeltaLinear

        def owned(mod):
            self._owners[id(mod.delta_values)] = weakref.ref(mod)
            return mod.delta_values

        if isinstance(params, SparseDeltaLinear):
            params = [params]
        if isinstance(params, nn.Module):
            out = []
            for mod in params.modules():
                if isinstance(mod, SparseDeltaLinear):
                    owned(mod)
            for p in params.parameters():
                if p.requires_grad:
                    out.append(p)
            if not out:
                raise ValueError("SparseAdamW: the model has no trainable parameter")
            return out
        out = []
        for item in params:
            if isinstance(item, SparseDeltaLinear):
                out.append(owned(item))
            else:
                out.append(item)
        return out

    def _state(self, p):
        st = self.state[p]
        if not st:
            for name, dtype in _STATE_DTYPES.items():
                st[name] = torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)
        elif st["exp_avg"].shape != p.shape:  # the kernels would read past the smaller buffers
            raise RuntimeError(f"SparseAdamW: a parameter of shape {list(p.shape)} has optimizer state of shape "
                               f"{list(st['exp_avg'].shape)} (SparseDeltaLinear.set_index_ with another number of "
                               "entries?): pass optimizer= to regrow_, or drop its state with "
                               "optimizer.state.pop(param)")
        return st

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("SparseAdamW takes dense (compact) gradients, not torch.sparse ones")
                values, grad = _local(p.data), _local(p.grad)
                if not values.is_contiguous() or not grad.is_contiguous():
                    raise RuntimeError("SparseAdamW: parameters and gradients must be contiguous")
                st = self._state(p)
                ref = self._owners.get(id(p))
                owner = ref() if ref is not None else None
                if owner is not None and not owner.keeps_merged:
                    owner = None  # its weight is held by FSDP & co.: the layer merges around each product
                merged = dict(merged=owner.weight.data, index=owner.delta_index, shape=tuple(owner.weight.shape),
                              block=owner.block, base=owner.base_values) if owner is not None else {}
                _impl(values.device).sparse_adamw_(values, grad, *(_local(st[n]) for n in _STATE_DTYPES),
                                                   lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                                                   weight_decay=group["weight_decay"], **merged)
                if owner is not None:
                    owner.mark_synced()
        return loss

    def load_state_dict(self, state_dict):
        """torch.optim.Optimizer.load_state_dict, keeping the state's own dtypes: torch casts every
        state tensor to its parameter's dtype, which made the int32 step counts float (and, for a
        bf16 parameter, rounded the fp32 moments and counts above 256) on every resume."""
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params):
            for name, value in state_dict["state"].get(saved_id, {}).items():
                if name not in _STATE_DTYPES:
                    continue
                if tuple(value.shape) != tuple(p.shape):
                    raise ValueError(f"SparseAdamW.load_state_dict: {name} has shape {list(value.shape)}, "
                                     f"its parameter {list(p.shape)}")
                self.state[p][name] = value.to(device=p.device, dtype=_STATE_DTYPES[name], copy=True)

    @torch.no_grad()
    def remap_(self, param, keep: torch.Tensor, order: torch.Tensor, is_new: torch.Tensor):
        """Follow a SparseDeltaLinear index change: kept entries keep their state, regrown ones
        start fresh (zero moments, step 0). keep: bool over the old entries; order: the sort that
        produced the new index from cat(kept, new); is_new: bool over the new entries."""
        st = self.state.get(param)
        if not st:
            return
        n_new = int(is_new.sum())
        for name in ("exp_avg", "exp_avg_sq", "steps"):
            t = st[name]
            flat = t.reshape(keep.numel(), -1)
            fresh = torch.zeros(n_new, flat.shape[1], dtype=t.dtype, device=t.device)
            st[name] = torch.cat([flat[keep], fresh])[order].reshape(param.shape)

    def state_bytes_per_entry(self) -> float:
        """Optimizer state bytes per trainable entry (12: two fp32 moments and an int32 step)."""
        n = sum(p.numel() for p in self.state)
        b = sum(t.numel() * t.element_size() for st in self.state.values() for t in st.values())
        return b / max(n, 1)
