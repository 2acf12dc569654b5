"""Maintainer tools of the vflowopt repository; not part of the installed package.

Users never import this: it lives next to ``benchmarks/`` in a clone and runs from the repository root
(``python -m training.vqa.train --help``). See :mod:`training.vqa`.
"""
