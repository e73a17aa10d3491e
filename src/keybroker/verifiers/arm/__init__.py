"""Arm verifiers: the Confidential Compute Architecture (CCA) realm attestation token."""
