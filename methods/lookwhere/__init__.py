"""LookWhere (Fuller et al., NeurIPS 2025): learn where to look (selector) and what to see (extractor).

``model`` the two networks, ``distill`` the what-where loss, ``method`` the registered ``lookwhere``
method (distill, then fine-tune at k), ``checkpoint`` official/lwbench weights, ``pretrain`` the
standalone (torchrun-able) distillation stage, ``figure`` the paper's Figure-3-style visualisation.
"""
