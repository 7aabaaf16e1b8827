"""The SageMaker serving handler. ``inference.py`` is copied verbatim into model.tar.gz as
``code/inference.py``; it must not import the ``bertopt`` package except through its fallback."""
