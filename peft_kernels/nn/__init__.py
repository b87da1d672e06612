"""Drop-in modules: they hold parameters and call one functional op each."""
from .branch import LoRABranchLinear
from .dora import DoRALinear
from .lora import LoRALinear
from .qlora import IntQDoRALinear, IntQLoRALinear, QDoRALinear, QLoRALinear
from .sparse import SparseDeltaLinear
from .sparse_embedding import SparseDeltaEmbedding, TiedRowsHead

__all__ = ["LoRALinear", "LoRABranchLinear", "DoRALinear", "QLoRALinear", "QDoRALinear", "IntQLoRALinear", "IntQDoRALinear",
           "SparseDeltaLinear", "SparseDeltaEmbedding", "TiedRowsHead"]
