"""Every node of the pack. Node ids never change once released: shared workflow
JSON files refer to them."""

from .kb_nodes import ReDiKBBuilder, ReDiKBLoader
from .redi_ksampler import ReDiKSampler
from .redi_sampler import ReDiSampler

NODES = [ReDiKBBuilder, ReDiKBLoader, ReDiKSampler, ReDiSampler]
