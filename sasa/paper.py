"""The paper's reported numbers (../shared/reference/sasa-paper.md), as data for tests and reports.

FLOPs in billions (2 x multiply-adds), params in millions, top-1 in %, ImageNet at 224 px.
"""

# (model, form) -> (GFLOPs, M params, top-1)
TABLE1 = {
    ("resnet26", "conv"): (4.7, 13.7, 74.5),
    ("resnet26", "conv_stem_attention"): (4.5, 10.3, 75.8),
    ("resnet26", "full_attention"): (4.7, 10.3, 74.8),
    ("resnet38", "conv"): (6.5, 19.6, 76.2),
    ("resnet38", "conv_stem_attention"): (5.7, 14.1, 77.1),
    ("resnet38", "full_attention"): (6.0, 14.1, 76.9),
    ("resnet50", "conv"): (8.2, 25.6, 76.9),
    ("resnet50", "conv_stem_attention"): (7.0, 18.0, 77.4),
    ("resnet50", "full_attention"): (7.2, 18.0, 77.6),
}

# ResNet-50, conv stem, attention in all groups: kernel_size -> (GFLOPs, M params, top-1)
TABLE4 = {3: (6.6, 18.0, 76.4), 5: (6.7, 18.0, 77.2), 7: (7.0, 18.0, 77.4), 9: (7.3, 18.0, 77.7), 11: (7.7, 18.0, 77.6)}

# ResNet-50, conv stem: attention groups -> (GFLOPs, M params, top-1 on the held-out split)
TABLE3 = {
    (1, 2, 3, 4): (7.0, 18.0, 80.2),
    (2, 3, 4): (7.3, 18.1, 80.7),
    (3, 4): (7.5, 18.5, 80.7),
    (4,): (8.0, 20.8, 80.2),
    (): (8.2, 25.6, 79.5),
    (1,): (7.9, 25.5, 79.7),
    (1, 2): (7.8, 25.0, 79.6),
    (1, 2, 3): (7.2, 22.7, 79.9),
}

# ResNet-50, held-out split: positional encoding -> (GFLOPs, top-1); the paper gives no params here
TABLE5 = {"none": (6.9, 77.6), "absolute": (6.9, 78.2), "relative": (7.0, 80.2)}

# Stem ablation, ResNet-50 with attention in every group: stem (sasa.layers.STEMS) -> top-1
STEM_ABLATION = {"attention_plain": 76.2, "attention_conv_values": 77.2, "attention": 77.6}

# Table 2 (COCO, RetinaNet with a ResNet-50 FPN): the abstract's ratios of the all-attention detector
# (full-attention backbone, attention FPN and heads) to the conv baseline, at the same mAP
DETECTION_RATIOS = {"flops": 0.61, "params": 0.66}
