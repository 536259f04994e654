"""Ways in to the engine over the network: the OpenAI-compatible server and its `serve` command."""
