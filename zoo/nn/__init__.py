from zoo.nn.batchnorm import ReferenceBatchNorm, batch_norm
from zoo.nn.fold import ScaleShift, fold_batchnorm, fold_conv_bn
from zoo.nn.norm import NORMS, get_norm_layer, gn_num_groups

__all__ = ["NORMS", "ReferenceBatchNorm", "ScaleShift", "batch_norm", "fold_batchnorm",
           "fold_conv_bn", "get_norm_layer", "gn_num_groups"]
