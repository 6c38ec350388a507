"""Pose sources for PMA's confidence maps: ground truth (keypoints.py) and BlazePose (blazepose.py)."""
