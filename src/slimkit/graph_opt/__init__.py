"""Graph optimisations that keep the function exactly (to float rounding): BN folding, constant
folding. Each works on a ``torch.fx`` capture and returns an ordinary ``nn.Module``."""
