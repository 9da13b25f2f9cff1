"""The toy world: small OWL-ViT, LLaVA and W trained on synthetic scenes whose truth is known."""
