"""Synthetic tasks for architecture ablations: MQAR (multi-query associative recall)."""

from mixerzoo.tasks.mqar import MQARConfig, evaluate_mqar, make_mqar, mqar_loss, train_mqar

__all__ = ["MQARConfig", "evaluate_mqar", "make_mqar", "mqar_loss", "train_mqar"]
