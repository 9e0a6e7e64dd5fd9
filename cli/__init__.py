"""m2y's command line: parses arguments, calls engine/, prints results. Nothing else."""
