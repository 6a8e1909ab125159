"""megatron-emo: EMO document-pool mixture-of-experts routing for Megatron-Core.

Importing this package imports neither megatron nor transformer-engine; the Megatron adapters
live in ``megatron_emo.mcore``.
"""

__version__ = "0.1.0"
