"""Hygon: CSV confidential VMs (``csv``) and DCU accelerators (``hygondcu``), both endorsed by
the Hygon Root Key (HRK) pinned in this package, with SM2 signatures over SM3 digests."""
