"""The reference ``mixlora`` 0.2.3 package as a test oracle."""

import mixlora


def attach_reference_adapter(model, adapter_dir):
    """Inject the adapter in ``adapter_dir`` with the reference package; eval mode everywhere.

    The reference keeps its experts in plain dicts that ``model.eval()`` cannot reach (its dropout
    bug), so they are put in eval mode here.
    """
    config, weights = mixlora.load_adapter_weights(str(adapter_dir), device="cpu")
    mixlora.inject_adapter_in_model(model, config, weights)
    model.eval()
    for layer in model.model.layers:
        for moe in layer.mlp.mixlora_moes.values():
            for expert in moe.experts_.values():
                expert.eval()
    return model
