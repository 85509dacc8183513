"""The lab: experiments that measure what Batch Normalization does, and their report.

``batchnorm lab`` (``batchnorm.lab.cli``) runs the experiments of
``batchnorm.lab.experiments`` (one module per claim of docs/claims.md) through
``batchnorm.lab.runner`` and writes results.json and an HTML report.
"""
