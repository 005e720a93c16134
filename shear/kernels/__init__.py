"""Math over weights, with no pass context and no plotting: saliency, calibration, sparsity, LHSPG decay,
recovery arithmetic, EBFT, losses, parameter allocation. Progress reaches a kernel as a callback."""
