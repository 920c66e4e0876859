"""The demo world: a generated graph, users and a hidden full ranker, end to end."""
