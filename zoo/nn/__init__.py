from zoo.nn.act import ACTS, get_act_layer
from zoo.nn.attention import ATTNS, get_attn_layer
from zoo.nn.batchnorm import ReferenceBatchNorm, batch_norm
from zoo.nn.fold import ScaleShift, fold_batchnorm, fold_conv_bn
from zoo.nn.norm import NORMS, get_norm_layer, gn_num_groups

__all__ = ["ACTS", "ATTNS", "NORMS", "ReferenceBatchNorm", "ScaleShift", "batch_norm", "fold_batchnorm",
           "fold_conv_bn", "get_act_layer", "get_attn_layer", "get_norm_layer", "gn_num_groups"]
