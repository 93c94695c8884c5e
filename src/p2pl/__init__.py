"""p2pl: peer-to-peer deep learning with no server (P2PL, Pranav & Moura, arXiv 2310.18861)."""

__version__ = "0.1.0"
