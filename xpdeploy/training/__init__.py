"""Training loops shared by the training stages (train now; finetune and learn_masks later)."""
