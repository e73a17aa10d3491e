"""KBS plugins (``resource``, ``sample``): what answers ``/kbs/v0/<plugin>/...``."""
