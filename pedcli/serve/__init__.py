"""`ped serve`: search a gallery from the browser (a page and a JSON API over `ped query`'s cached
gallery features). `service` holds the search, `app` the web layer, `server` the command's startup."""
