"""pedcli: text-based person search toolkit (PMA, MGEL, HAN, MIA, NAFS and a global baseline)."""

__version__ = "0.1.0"
