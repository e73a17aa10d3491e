"""IBM verifiers: Secure Execution for Linux on IBM Z and LinuxONE (``se``)."""
