"""Connectors carry out one approved action each. New ones plug in through the ``pdp.connectors`` entry point."""
