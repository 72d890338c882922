"""fedsp-toy-app: a numpy-only Flower App for the localhost deployment tests."""
