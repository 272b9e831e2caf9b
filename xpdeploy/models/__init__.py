"""timm model loading, architecture description, rebuilding from arch.json, MAC counting."""
