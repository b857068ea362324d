"""The science of training: the paper's knowledge-distillation experiment (WRN teacher and
students, CIFAR-10/digits readers, explanation and KD losses, differentiable student maps, a
resumable trainer) and fine-tuning a classifier on VOC2007 (multi-label BCE, mAP)."""
