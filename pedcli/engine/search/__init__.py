"""Search a folder of images with a sentence: gallery store, queries, HTML report, attention views."""
