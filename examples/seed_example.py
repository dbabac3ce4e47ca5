"""The seed's two functions on lists, arrays and tensors."""

import numpy as np
import torch

import meanablate as ma

activations = [[0.5, 1.2, -0.3], [0.7, 0.9, 0.1]]  # [batch, n]
means = [0.6, 1.05, -0.1]  # [n]
ablated = ma.mean_ablation(activations, means, [1])
print(ablated)  # [[0.5, 1.05, -0.3], [0.7, 1.05, 0.1]]
print(ma.compute_ablation_effect([1.0, 2.0, 3.0], [1.0, 2.5, 2.0]))  # 1.118034

x = torch.randn(4, 16, 64)  # [batch, pos, n]: any leading shape
print(ma.mean_ablation(x, x.mean(dim=(0, 1)), [3, 7]).shape)
print(ma.compute_ablation_effect(np.ones((2, 3)), np.zeros((2, 3))))  # per row
