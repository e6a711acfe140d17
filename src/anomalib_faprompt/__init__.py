"""anomalib-faprompt."""
