"""Compressed-branch attention: queries attend to the complete compressed blocks they can see."""
