"""jaxscale data: corpora, cleaning, tokenizers and grain loaders."""
