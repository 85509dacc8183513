"""The library's core, bottom to top: ``reference`` (NumPy float64, the formula),
``stats`` (moments, their merge, the one guarded running update), ``ops`` (custom ops
around the kernels, for tracers), ``autograd`` (the Functions with the closed-form
backward), ``masking`` (weighted statistics), ``plan`` (the one decision of a call),
``functional`` (the functional API), ``modules`` (BatchNorm1d/2d/3d, the statistics rule,
the 1d/2d/3d table) and ``tree`` (walking a model's module tree). See docs/design.md."""
