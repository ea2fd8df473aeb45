"""upt: few-shot prompt tuning (CoOp, VPT, UPT and its ablations) over a frozen open_clip model.

The ML core: no web, no database, no task queue. Start from `upt.backbone.load_backbone`,
`upt.training.train` and `upt.predict.Predictor`.
"""

__version__ = "0.1.0"
