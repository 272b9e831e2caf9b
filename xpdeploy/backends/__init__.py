"""Runners behind one interface (design.md section 4): TorchRunner, OrtRunner, TrtRunner.

A runner is a context manager: constructing it only stores what to run; ``__enter__`` opens the
session, ``infer`` maps float32 NCHW pixels to float32 logits, ``__exit__`` frees resources.
"""
