"""Every node of the pack. Node ids never change once released: shared workflow
JSON files refer to them."""

from .feature_reuse import ReDiFeatureReuse
from .kb_nodes import ReDiKBBuilder, ReDiKBLoader
from .redi_ksampler import ReDiKSampler
from .redi_record import ReDiRecord
from .redi_sampler import ReDiSampler
from .style_split_node import ReDiStyleSplit

NODES = [ReDiKBBuilder, ReDiKBLoader, ReDiKSampler, ReDiSampler, ReDiStyleSplit, ReDiFeatureReuse, ReDiRecord]
