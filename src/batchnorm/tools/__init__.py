"""Tools that act on whole models: ``convert`` (swap torch.nn <-> ours), ``fold`` (into
the previous layer), ``calibrate`` (PreciseBN), ``adapt`` (AdaBN, TENT), ``guards``
(statistics that skip bad batches, micro-batch accumulation), ``diagnostics`` (misuse
checks), ``find_layers`` (the BN layers of a model) and ``keras_flax`` (Keras/Flax weight
converters)."""
