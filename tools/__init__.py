"""irm-tool: the admin's and the vendor's command line, the fleet and benches."""
