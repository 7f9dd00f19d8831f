"""Movers: the parts of vipd that change where the VIPs are (the local kernel today;
cloud APIs later), behind one small interface (`base.VipMover`)."""
