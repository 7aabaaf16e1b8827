"""bertopt: fine-tune, optimize, measure and deploy BERT-family text classifiers."""

__version__ = "0.1.0"
