"""Submit, follow and control alexray jobs; home of the ``alexray`` command."""
