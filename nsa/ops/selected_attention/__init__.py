"""Selected-branch attention: each query group attends to the tokens of its selected blocks."""
