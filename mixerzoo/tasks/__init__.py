"""Synthetic tasks for architecture ablations: MQAR (multi-query associative recall), visual
recall from rendered digit images and video, and the one loop that trains and scores on them."""

from mixerzoo.tasks.loop import IGNORE, answer_accuracy, answer_loss, fit, task_logits
from mixerzoo.tasks.mqar import MQARConfig, evaluate_mqar, make_mqar, train_mqar
from mixerzoo.tasks.visual import StreamRecallConfig, VisualRecallConfig, make_stream_recall, make_visual_recall

__all__ = ["IGNORE", "MQARConfig", "StreamRecallConfig", "VisualRecallConfig", "answer_accuracy", "answer_loss",
           "evaluate_mqar", "fit", "make_mqar", "make_stream_recall", "make_visual_recall", "task_logits", "train_mqar"]
