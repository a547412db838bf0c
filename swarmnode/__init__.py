"""swarmnode: node software for decentralized RL post-training (SAPO) over signed libp2p gossip."""

__version__ = "0.1.0"
